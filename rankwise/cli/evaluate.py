"""rankwise eval: perplexity, KL and top-1 agreement against the dense model."""
DESCRIPTION = ("Perplexity on a text (default WikiText-2 test; non-overlapping windows) and, "
               "against a reference (dense) model, the KL divergence and top-1 agreement of "
               "next-token predictions.")


def option_classes():
    from ..entrypoints import EvalConfig
    return [EvalConfig]


def run(configs) -> None:
    from ..entrypoints import EvalConfig, evaluate_model

    config = configs[EvalConfig]
    o = evaluate_model(config)
    r = o.report
    print(f"evaluated {o.source} on {r.tokens} predicted tokens "
          f"({o.windows[0]} windows x {o.windows[1]})")
    if r.kl is not None:
        print(f"  dense perplexity       {r.reference_perplexity:10.3f}  "
              f"({o.reference_params:,} parameters)")
    print(f"  perplexity             {r.perplexity:10.3f}  ({o.params:,} parameters)")
    if r.kl is not None:
        print(f"  KL(dense || model)     {r.kl:10.4f}  nats/token")
        print(f"  top-1 agreement        {r.top1_agreement:10.4f}")
    if config.ranks and o.manifest is not None:
        print("  per-layer ranks:")
        for name, rank in o.manifest["ranks"].items():
            print(f"    {name:50s} {rank}")
