"""rankwise compress: factorize a model's block linears and save the result."""
DESCRIPTION = ("Replace the linear layers inside the transformer blocks by low-rank factors "
               "chosen in an information-geometric metric, and save the result to --out.")


def option_classes():
    from ..cut.config import CompressConfig
    from ..data.config import CalibrationConfig
    from ..entrypoints import CompressRun
    from ..formats.storage import StorageConfig
    return [CompressRun, CompressConfig, CalibrationConfig, StorageConfig]


def describe_forms(forms) -> str:
    """How many layers took each form, e.g. "lowrank 67 (int4 54, int8 13), rounded 63 (...)"."""
    from collections import Counter

    from ..forms.kinds import DENSE
    kinds = Counter(f.kind for f in forms.values())
    widths = Counter((f.kind, f.bits) for f in forms.values())
    parts = []
    for kind, count in kinds.most_common():
        inner = ", ".join(f"{'float' if b == 16 else f'int{b}'} {n}"
                          for (k, b), n in sorted(widths.items(), key=lambda kv: -kv[1]) if k == kind)
        parts.append(f"{kind} {count}" + (f" ({inner})" if kind != DENSE.name else ""))
    return ", ".join(parts)


def run(configs) -> None:
    from ..cut.config import CompressConfig
    from ..data.config import CalibrationConfig
    from ..entrypoints import CompressRun, compress_model
    from ..formats.storage import StorageConfig
    from ..serving.engines import ENGINES

    config = configs[CompressConfig]
    outcome = compress_model(configs[CompressRun], config, configs[CalibrationConfig],
                             storage=configs[StorageConfig])
    s = outcome.summary
    print(f"{config.budget.describe(s)}: {describe_forms(s.forms)} in "
          f"{s.seconds['total']:.1f} s -> {outcome.folder}")
    for name, report in (outcome.manifest.serving or {}).items():
        print(ENGINES[name].describe(report))
    stored = outcome.manifest.storage      # under torchrun: the writing rank's
    if stored:
        print(f"weights: {stored.tensor_bytes:,} bytes ({stored.dtype}; "
              f"{', '.join(stored.grids) or 'no integer grid'}); targeted layers "
              f"{stored.bits_per_targeted_param:.2f} bits per original parameter")
