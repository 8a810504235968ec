"""rankwise compress: factorize a model's block linears and save the result."""
DESCRIPTION = ("Replace the linear layers inside the transformer blocks by low-rank factors "
               "chosen in an information-geometric metric, and save the result to --out.")


def option_classes():
    from ..config import CalibrationConfig, CompressConfig
    from ..entrypoints import CompressRun
    return [CompressRun, CompressConfig, CalibrationConfig]


def run(configs) -> None:
    from ..config import CalibrationConfig, CompressConfig
    from ..entrypoints import CompressRun, compress_model

    config = configs[CompressConfig]
    outcome = compress_model(configs[CompressRun], config, configs[CalibrationConfig])
    s = outcome.summary
    kept = sum(r is not None for r in s.ranks.values())
    print(f"compressed {kept}/{len(s.ranks)} layers with {config.metric}: removed "
          f"{s.achieved_ratio:.4f} of the targeted parameters (requested {config.ratio}) "
          f"in {s.seconds['total']:.1f} s -> {outcome.folder}")
