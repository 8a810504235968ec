"""rankwise quantize: round an output's factors onto 8- or 4-bit integers."""
DESCRIPTION = ("Round the factors of a rankwise output onto 8-bit (per output row) or 4-bit "
               "(per group) integers with error-compensating rounding in the factors' input "
               "metric, and save them to --out in the compressed-tensors format.")


def option_classes():
    from ..config import StorageConfig
    from ..entrypoints.quantize import QuantizeRun
    return [QuantizeRun, StorageConfig]


def run(configs) -> None:
    from ..config import StorageConfig
    from ..entrypoints.quantize import QuantizeRun, quantize_output

    record = quantize_output(configs[QuantizeRun], configs[StorageConfig])
    stored = record["storage"]
    print(f"factors rounded to {stored['factors']}: weights {stored['tensor_bytes']:,} bytes, "
          f"targeted layers {stored['bits_per_targeted_param']:.2f} bits per original "
          f"parameter -> {record['folder']}")
