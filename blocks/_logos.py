"""Logos of detstream's blocks: Prefect's own generic artwork at a pinned commit (detstream hosts no images)."""

_PREFECT_ART = ("https://raw.githubusercontent.com/PrefectHQ/prefect/"
                "420d0d6a78bb6df1fc18bcf188fdad43c1d22ea9/assets/block-logos")
CREDENTIALS = f"{_PREFECT_ART}/secret.png"  # blocks that hold a login
SETTINGS = f"{_PREFECT_ART}/process.png"  # blocks that describe what runs
