"""Generation from a trained LDM: the subjects' attributes (attributes.py) and their images
(generator.py), shared by the sample stage and the checks that generate (paired conditioning check)."""
