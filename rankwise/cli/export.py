"""rankwise export: a compressed output as a plain dense checkpoint."""
DESCRIPTION = ("Write a rankwise output as a plain transformers checkpoint of its base "
               "architecture, every factor pair merged back into a dense weight, for runtimes "
               "without factorized layers. (The output folder itself already loads with "
               "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).)")


def option_classes():
    from ..export import ExportConfig
    return [ExportConfig]


def run(configs) -> None:
    from ..export import ExportConfig, export_dense
    config = configs[ExportConfig]
    print(f"merged factors -> {export_dense(config.model, config.dense)}")
