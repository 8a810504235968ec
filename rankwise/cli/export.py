"""rankwise export: a compressed output in another format (dense: factors merged back)."""
DESCRIPTION = ("Write a rankwise output in another format to --out, for runtimes that do not "
               "load the output folder itself (which plain transformers already loads with "
               "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)); "
               "dense: a plain checkpoint of the base architecture, every factor pair merged "
               "back into a dense weight.")


def option_classes():
    from ..entrypoints.export import ExportConfig
    return [ExportConfig]


def run(configs) -> None:
    from ..entrypoints.export import ExportConfig, export
    config = configs[ExportConfig]
    print(f"{config.format} export -> {export(config)}")
