"""The SFAPI blocks: NerscCompute holds NerscJobSettings (one definition of the job's fields)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from detstream.backends.jobscript import NerscJobSettings
from detstream.blocks import NerscCompute


def test_compute_holds_the_job_settings_and_their_checks():
    assert NerscCompute().job_settings() == NerscJobSettings()
    compute = NerscCompute(job=NerscJobSettings(account="m0001", walltime_minutes=60))
    assert compute.job_settings().account == "m0001"
    with pytest.raises(ValidationError, match="exceeds the 120-minute cap"):
        NerscCompute(job={"walltime_minutes": 500})
    schema = NerscCompute.model_json_schema()
    assert list(schema["properties"]) == ["job"]
    assert schema["properties"]["job"]["$ref"].endswith("/NerscJobSettings")


def test_flat_fields_of_documents_saved_before_nesting_move_into_job():
    old = NerscCompute.model_validate({"account": "m0001", "walltime_minutes": 60, "job": {"qos": "debug"}})
    assert old.job == NerscJobSettings(account="m0001", walltime_minutes=60, qos="debug")
    assert not (set(old.model_dump()) - {"job", "block_type_slug"})


@pytest.mark.e2e  # needs Prefect's own server
def test_saved_compute_block_round_trips(prefect_harness):
    NerscCompute(job=NerscJobSettings(account="m0001", modules=["python"])).save("rt-compute", overwrite=True)
    assert NerscCompute.load("rt-compute").job_settings() == NerscJobSettings(account="m0001", modules=["python"])
