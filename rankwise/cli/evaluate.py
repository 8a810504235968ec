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
    print(f"evaluated {o.source} ({o.params:,} parameters"
          + (f"; dense {o.reference_params:,}" if o.reference_params else "") + ")")
    if o.disk:
        bits = o.disk["bits_per_targeted_param"]
        grids = ", ".join(o.disk["grids"]) or "no integer grid"
        print(f"  weights on disk: {o.disk['bytes']:,} bytes ({o.disk['dtype']}; {grids}"
              + (f"; {bits:.2f} bits per original targeted parameter" if bits else "") + ")")
    compared = o.reference_params is not None
    if o.reports:
        print(f"  {'text':12s} {'tokens':>8s} {'ppl':>10s}" + (
            f" {'dense ppl':>10s} {'x dense':>8s} {'KL':>8s} {'top-1':>7s}" if compared else ""))
    for name, r in o.reports.items():
        line = f"  {name:12s} {r.tokens:8d} {r.perplexity:10.3f}"
        if compared:
            line += (f" {r.reference_perplexity:10.3f} {r.perplexity / r.reference_perplexity:8.3f}"
                     f" {r.kl:8.4f} {r.top1_agreement:7.4f}")
        print(line)
    if compared and o.reports:
        print("  (KL: KL(dense || model) in nats per token; top-1: agreement of next-token argmax)")
    for task, metrics in o.tasks.items():
        for metric, value in metrics.items():
            dense = o.reference_tasks.get(task, {}).get(metric)
            print(f"  {task:20s} {metric:12s} {value:8.4f}"
                  + (f"  (dense {dense:.4f}, {value - dense:+.4f})" if dense is not None else ""))
    if o.speed:
        line = f"  generate speed: prefill {o.speed['prefill']:.1f} tok/s, decode {o.speed['decode']:.1f} tok/s"
        if "dense_prefill" in o.speed:
            line += (f" ({o.speed['prefill'] / o.speed['dense_prefill']:.2f}x and "
                     f"{o.speed['decode'] / o.speed['dense_decode']:.2f}x dense)")
        print(line)
    if config.ranks and o.manifest is not None:
        print("  per-layer ranks:")
        for name, rank in o.manifest.ranks.items():
            print(f"    {name:50s} {rank}")
