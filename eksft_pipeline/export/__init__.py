"""Export: trained models as self-contained HF folders with a model card (stage `export`)."""
