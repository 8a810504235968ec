"""rankwise finetune: train a causal LM down to a parameter budget (factors, hard, svt)."""
DESCRIPTION = ("Train a causal LM down to a parameter budget: one-shot compression then "
               "training the factors (factors), dense training with periodic hard truncation "
               "(hard, TRP), or proximal gradient on the singular values (svt). It trains on "
               "WikiText-2 validation minus a held-out calibration part and is saved to --out.")


def option_classes():
    from ..entrypoints.finetune import FinetuneRun
    from ..train import FinetuneConfig
    return [FinetuneConfig, FinetuneRun]


def run(configs) -> None:
    from ..entrypoints.finetune import FinetuneRun, finetune_model
    from ..train import FinetuneConfig

    config = configs[FinetuneConfig]
    o = finetune_model(configs[FinetuneRun], config)
    r, result = o.report, o.result
    print(f"test perplexity {r.perplexity:.3f} (dense {r.reference_perplexity:.3f}), "
          f"KL(dense || model) {r.kl:.4f}, top-1 agreement {r.top1_agreement:.4f}")
    print(f"{config.method}: {config.steps} steps, removed {result.achieved_ratio:.4f} of the "
          f"targeted parameters (requested {config.ratio}) in {result.seconds:.0f} s -> {o.folder}")
