"""rankwise dln: the research lab's deep linear network experiments."""
DESCRIPTION = ("Low-dimensional learning dynamics: train a wide deep linear network and a "
               "compressed one (narrow, spectral init, faster outer layers) on low-rank "
               "recovery, or carry the idea to an MLP / ViT on real digits.")


def option_classes():
    from ..lab.experiments import DlnConfig
    return [DlnConfig]


def run(configs) -> None:
    from ..lab.experiments import DlnConfig, run_experiment
    print(run_experiment(configs[DlnConfig]))
