"""rankwise finetune: train a model down to a parameter budget (factors, hard, svt)."""
DESCRIPTION = ("Train a model down to a parameter budget: one-shot compression then training "
               "the factors (factors), dense training with periodic hard truncation (hard, "
               "TRP), or proximal gradient on the singular values (svt). The LLM trains on "
               "WikiText-2 validation minus a held-out calibration part and is saved to --out; "
               "an image task first trains its dense MLP.")


def option_classes():
    from ..train import FinetuneConfig, FinetuneRun
    return [FinetuneConfig, FinetuneRun]


def run(configs) -> None:
    from ..train import FinetuneConfig, FinetuneRun

    run_options, config = configs[FinetuneRun], configs[FinetuneConfig]
    if run_options.task != "lm":
        from ..lab.image_finetune import finetune_images
        print(finetune_images(run_options, config))
        return
    from ..entrypoints import finetune_model
    o = finetune_model(run_options, config)
    r, result = o.report, o.result
    print(f"test perplexity {r.perplexity:.3f} (dense {r.reference_perplexity:.3f}), "
          f"KL(dense || model) {r.kl:.4f}, top-1 agreement {r.top1_agreement:.4f}")
    print(f"{config.method}: {config.steps} steps, removed {result.achieved_ratio:.4f} of the "
          f"targeted parameters (requested {config.ratio}) in {result.seconds:.0f} s -> {o.folder}")
