"""rankwise heal: distil a compressed model toward its dense teacher."""
DESCRIPTION = ("Train the factors of a compressed rankwise output (optionally its norms and "
               "biases) to match the dense teacher's next-token distributions (KL "
               "distillation) on its calibration sources, and save an ordinary rankwise "
               "output to --out.")


def option_classes():
    from ..entrypoints.heal import HealRun
    from ..train.heal import HealConfig
    return [HealRun, HealConfig]


def run(configs) -> None:
    from ..entrypoints.heal import HealRun, heal_model
    from ..train.heal import HealConfig

    o = heal_model(configs[HealRun], configs[HealConfig])
    r = o.result
    if r.losses:
        print(f"healed {r.trained_params:,} parameters for {r.steps} steps in {r.seconds:.0f} s: "
              f"KL to the teacher {r.losses[0]:.4f} -> {r.losses[-1]:.4f} (per token, "
              f"last step) -> {o.folder}")
    else:
        print(f"no healing step was taken (time budget spent) -> {o.folder}")
