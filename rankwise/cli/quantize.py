"""rankwise quantize: round an output's layers, at a width or within a budget in bits."""
DESCRIPTION = ("Round a rankwise output in its own metric and save it to --out in the "
               "compressed-tensors format: its layers as they are at --factor-bits 8 or 4, "
               "or each layer given the form (low rank, factors rounded, weight rounded, "
               "rounded plus a low-rank correction) that a budget of --bits stored bits per "
               "original parameter buys at the least predicted loss.")


def option_classes():
    from ..entrypoints.quantize import QuantizeConfig, QuantizeRun
    from ..formats.storage import StorageConfig
    return [QuantizeRun, QuantizeConfig, StorageConfig]


def run(configs) -> None:
    from ..entrypoints.quantize import QuantizeConfig, QuantizeRun, quantize_output
    from ..formats.storage import StorageConfig

    folder, record = quantize_output(configs[QuantizeRun], configs[QuantizeConfig],
                                     configs[StorageConfig])
    stored = record.storage
    print(f"rounded ({', '.join(stored.grids) or 'no grid'}): weights "
          f"{stored.tensor_bytes:,} bytes, targeted layers "
          f"{stored.bits_per_targeted_param:.2f} bits per original parameter -> {folder}")
