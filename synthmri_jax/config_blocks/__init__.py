"""One builder per config block (tokenizer, ldm + sample, classifier + evaluate, privacy), each
documenting its fields; `configs/*.py` assemble them."""
