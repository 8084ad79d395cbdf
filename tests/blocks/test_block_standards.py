"""Prefect's standard checks for every detstream block: description, documentation, code example, logo."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from conftest import NO_INTERNET
from detstream.blocks import DetectorProfile, EtcdCoordinator, NerscCompute, SfapiCredentials, SlurmCompute


@pytest.mark.parametrize("block", [DetectorProfile, EtcdCoordinator, NerscCompute, SfapiCredentials,
                                   SlurmCompute])
class TestBlockStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block):
        return block

    @pytest.fixture(autouse=True)
    def _logo_reachable(self, request, block):
        """The logo check downloads the logo: skipped, not failed, on a machine without internet
        (the one skip CI allows). An HTTP error is an answer from the internet: a broken logo URL
        fails."""
        if request.node.originalname != "test_has_a_valid_image" or not block._logo_url:
            return
        try:
            urllib.request.urlopen(str(block._logo_url), timeout=5).close()
        except urllib.error.HTTPError as err:
            pytest.fail(f"the logo {block._logo_url} cannot be downloaded: {err}")
        except OSError as err:  # no route, no DNS, refused, timed out: no internet here
            pytest.skip(f"{NO_INTERNET}cannot download {block._logo_url} here: {err}")
