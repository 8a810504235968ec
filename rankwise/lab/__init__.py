"""Research beside the product: compressed deep linear networks (C-DLN) on low-rank
recovery, small vision models on shipped digit images, and the transfer of the C-DLN to
them. The compression core (rankwise.*) never imports anything from here; results that
prove themselves graduate into the core, as torchao's prototype folder does."""
