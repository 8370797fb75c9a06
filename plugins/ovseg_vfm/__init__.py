"""VFM-guided CLIP predictors: ProxyCLIP (`proxyclip`) and CASS (`cass`), each owning a vision foundation model."""
