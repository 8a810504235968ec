"""rankwise images: the research lab's fine-tuning of an image MLP under a rank constraint."""
DESCRIPTION = ("Train a dense MLP on shipped digit images, then train it down to a parameter "
               "budget (factors, hard or svt, as `rankwise finetune` does for a language "
               "model); writes history.json and training.png to --out.")


def option_classes():
    from ..lab.image_finetune import ImageRun
    from ..train import FinetuneConfig
    return [FinetuneConfig, ImageRun]


def run(configs) -> None:
    from ..lab.image_finetune import ImageRun, finetune_images
    from ..train import FinetuneConfig
    print(finetune_images(configs[ImageRun], configs[FinetuneConfig]))
