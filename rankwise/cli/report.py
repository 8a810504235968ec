"""rankwise report: one HTML page comparing runs."""
DESCRIPTION = ("Write one self-contained HTML page comparing rankwise output folders: a "
               "sortable table (recipe, ratio, parameters, perplexity per text, KL, top-1, "
               "lm-eval accuracies, speed where `rankwise eval` measured them), a Pareto plot "
               "of quality against kept parameters, and every run's rank chart.")


def option_classes():
    from ..evaluation.report import ReportConfig
    return [ReportConfig]


def run(configs) -> None:
    from ..evaluation.report import ReportConfig, write_report
    print(f"report -> {write_report(configs[ReportConfig])}")
