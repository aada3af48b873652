"""Plain functions that turn LoRA adapters into spectra: fetch, validate, spectra, store. No Prefect."""
