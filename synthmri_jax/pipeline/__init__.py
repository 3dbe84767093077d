"""The pipeline's stages, one module each, in run order: prepare, tokenizer, ldm, sample,
classify, evaluate, report. Each exposes `run(config, workdir)` (registered in
`synthmri_jax.stages`); the models, tasks and statistics they use live outside this package."""
