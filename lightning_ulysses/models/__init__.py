"""Reading Hugging Face models: finding the model in a LightningModule and what SP needs from it (:mod:`.inspect`),
LoRA/PEFT adapters (:mod:`.adapters`), FLOP formulas (:mod:`.flops`)."""
