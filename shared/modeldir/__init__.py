"""A model directory (or Hub id), read and written in one place: its config, tokenizer, image
processor, weights, value head, generation config and lmforge's run record. Every layer above
reads models through here: data/ (tokenizers and processors for packing), model/ (building a
model for a device), train/, infer/ (serve, eval, chat) and board/.

    config.py      config.json: load, raw dict, what kind of model it is (quantized, adapter, vision)
    tokenizers.py  the tokenizer (with the tokens `data pack` added), its fingerprint, saving it back
    weights.py     the weights (from_pretrained with one-line errors), the value head, the image
                   processor and generation config written beside trained weights
"""
