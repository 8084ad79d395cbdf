"""The Prefect UI in a real browser: the streaming-session deployment's run form and a finished
run's artifacts, on the server of tests/prefect_server.py. Headless Chromium (Debian's
`chromium`) driven by Playwright; screenshots go to tests/artifacts/ui/."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from prefect_server import STREAMING

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.ui, pytest.mark.timeout(900), pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (Debian's chromium package; .ci/run installs it)")]
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
# What a page shows when it failed (Prefect's own error texts); the page must show none.
ERRORS = ["Something went wrong", "Can't connect to Server API", "Page not found", "Not Found",
          "Oops", "Failed to", "Unable to"]
FORM_PARAMETERS = ["scan_width", "scan_height", "detector", "nodes", "workers_per_node", "source",
                   "output_dir", "backend", "fallback", "etcd_url", "stall_timeout_s"]
TIMEOUT_MS = 60_000


def _block_logos() -> set[str]:
    """The logos of detstream's block types: images a block picker shows, loaded from where they are hosted."""
    from detstream import blocks

    return {str(getattr(blocks, name)._logo_url) for name in blocks.__all__}


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium profile; every request off this machine is blocked and
    recorded (telemetry must be off: the test fails if the UI tried to reach out), except a
    block type's logo, which is blocked only."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    outside: list[str] = []
    page_errors: list[str] = []
    logos = _block_logos()

    def route(r):
        host = urlsplit(r.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            return r.continue_()
        if r.request.url not in logos:
            outside.append(r.request.url)
        return r.abort()

    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=ARGS, viewport={"width": 1400, "height": 1000})
        try:
            ctx.route("**/*", route)
            page = ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            yield page
        finally:
            ctx.close()
    assert not page_errors, f"uncaught errors in the page: {page_errors}"
    assert not outside, f"the UI tried to reach outside this machine: {sorted(set(outside))}"


def _no_error_shown(page, what: str) -> str:
    text = page.inner_text("body")
    shown = [e for e in ERRORS if e.lower() in text.lower()]
    assert not shown, f"{what} shows an error: {shown}\n{text[:2000]}"
    return text


def _shot(page, name: str, height: int | None = None) -> Path:
    if height:
        page.set_viewport_size({"width": 1400, "height": height})
    page.wait_for_load_state("networkidle")
    path = SHOTS / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def _prop(page, name: str):
    """The form field of parameter ``name`` (its label reads "name (Optional)")."""
    return page.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=re.compile(rf"^{name} \(")))


def test_run_form_lists_the_parameters_and_submits(prefect_deployments, deployment_runs, browser):
    server, page = prefect_deployments, browser
    with server.settings():
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(STREAMING)
    page.goto(f"{server.url}/deployments/deployment/{dep.id}/run")
    page.get_by_text("Parameters", exact=True).wait_for()
    for name in FORM_PARAMETERS:
        _prop(page, name).first.wait_for()
    _shot(page, "deployment-run-form.png", height=3600)
    text = _no_error_shown(page, "the run form")
    missing = [n for n in FORM_PARAMETERS if not re.search(rf"^{n} \(", text, re.M)]
    assert not missing, f"the form lacks {missing}"
    for words in ("built-in profile", "saved DetectorProfile block", "Compute nodes (one distributor each).",
                  "Where the nodes come from"):
        assert words in text, f"the form lacks {words!r}"

    # The form works: a 4x4 scan on the small test camera, picked from the detector's list.
    for side in ("scan_width", "scan_height"):
        _prop(page, side).locator("input[type=number]").fill("4")
    page.set_viewport_size({"width": 1400, "height": 1000})
    detector = _prop(page, "detector")
    detector.locator("button.p-select-button__control").focus()
    page.keyboard.press(" ")  # opens the list (a synthetic click opens and closes it at once)
    options = page.locator(".p-select-option[role=option]")
    options.filter(has_text="testcam").first.wait_for()
    assert {"4dcamera", "testcam"} <= {o.strip() for o in options.all_inner_texts()}
    _shot(page, "deployment-run-form-detector-choices.png")
    options.filter(has_text="testcam").first.click()
    assert detector.locator(".p-select-button__value").inner_text().strip() == "testcam"
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(rf".*/deployments/deployment/{dep.id}(\?.*)?$"))  # back to the deployment
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect_server import wait_for

    def submitted():
        with server.settings(), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        return [r for r in runs if r.parameters.get("scan_width") == 4]

    run = wait_for(submitted, 30, "the flow run submitted from the form")[0]
    with server.settings(), get_client(sync_client=True) as client:
        client.delete_flow_run(run.id)  # no worker runs it; it is not wanted after this test
    assert (run.parameters["scan_width"], run.parameters["scan_height"], run.parameters["detector"]) == (4, 4, "testcam")
    assert run.parameters["output_dir"] == dep.parameters["output_dir"]  # the deployment's defaults came along


def test_finished_run_shows_its_artifacts(prefect_deployments, deployment_runs, browser):
    server, page = prefect_deployments, browser
    run = deployment_runs["streaming"]
    assert run.state.is_completed()
    page.goto(f"{server.url}/runs/flow-run/{run.id}")
    page.get_by_text("Completed", exact=True).first.wait_for()
    page.get_by_text("Artifacts", exact=True).first.click()
    for prefix in ("summary-", "report-", "scan-progress-", "bright-field-"):
        page.get_by_text(re.compile(rf"^{prefix}[0-9a-z-]+$")).first.wait_for()
    _shot(page, "flow-run-artifacts.png", height=1400)
    _no_error_shown(page, "the run's artifacts tab")

    with server.settings():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    arts = {kind: next(a for a in found if a.key.startswith(f"{kind}-")) for kind in ("bright-field", "summary")}
    # The image, drawn by the browser (decoded, with a size), and the summary table.
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(f"{server.url}/artifacts/artifact/{arts['bright-field'].id}")
    img = page.locator("img[src^='data:image/png;base64,']").first
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    assert img.evaluate("img => img.naturalWidth") >= 384
    _shot(page, "bright-field-artifact.png")
    _no_error_shown(page, "the bright-field artifact")

    page.goto(f"{server.url}/artifacts/artifact/{arts['summary'].id}")
    page.get_by_text("frames_received", exact=True).wait_for()
    _shot(page, "summary-table-artifact.png")
    _no_error_shown(page, "the summary table artifact")


def _ranks(a):
    return np.argsort(np.argsort(np.asarray(a).ravel())).astype(float)


def test_live_images_artifact_shows_the_specimen(prefect_deployments, deployment_runs, browser):
    """The last live-images drawing of the finished 8x8 run, as the browser shows it: four panels,
    and the screenshot's colours follow the simulated specimen (bright field its thickness, the
    centre of mass its deflection; 4D Camera, seed 0, as the deployment runs it)."""
    import io

    import matplotlib.image

    from detstream.output.images import figure_layout
    from detstream.profile import get_profile
    from detstream.sources import Simulator

    server, page = prefect_deployments, browser
    run = deployment_runs["streaming"]
    assert run.state.is_completed()
    with server.settings():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    live = max((a for a in found if a.key.startswith("live-images-")), key=lambda a: a.created)
    assert "64/64 frames counted" in live.data  # the last drawing: the whole scan
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(f"{server.url}/artifacts/artifact/{live.id}")
    img = page.locator("img[src^='data:image/png;base64,']").first
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    _shot(page, "live-images-artifact.png")
    _no_error_shown(page, "the live-images artifact")
    natural = img.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    layout = figure_layout([(8, 8)] * 4)  # bright field, dark field, centre of mass x and y
    assert tuple(natural) == layout.size
    png = img.screenshot(path=str(SHOTS / "live-images-drawn.png"))  # the image as the browser drew it
    shot = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    sy, sx = shot.shape[0] / natural[1], shot.shape[1] / natural[0]

    def blocks(panel: int) -> np.ndarray:
        """The colour at the centre of each scan position's block of a panel: (8, 8, 3)."""
        x0, y0, _, _ = layout.images[panel]
        k = layout.scale
        out = np.zeros((8, 8, 3))
        for r in range(8):
            for c in range(8):
                out[r, c] = shot[int((y0 + (r + 0.5) * k) * sy), int((x0 + (c + 0.5) * k) * sx)]
        return out

    truth = Simulator(get_profile("4dcamera"), 8, 8, seed=0).ground_truth()
    bf = blocks(0)
    assert np.ptp(bf[..., 0]) > 0.5 and np.allclose(bf[..., 0], bf[..., 2], atol=0.02)  # grey, full range
    assert np.corrcoef(bf[..., 0].ravel(), truth.thickness.ravel())[0, 1] >= 0.9
    # Centre of mass on a diverging map (blue below 0, red above): red minus blue orders the
    # positions as the deflection does.
    for panel, deflection in ((2, truth.deflection_x), (3, truth.deflection_y)):
        rgb = blocks(panel)
        signed = rgb[..., 0] - rgb[..., 2]
        assert signed.max() > 0.3 and signed.min() < -0.3  # both signs drawn
        assert np.corrcoef(_ranks(signed), _ranks(deflection))[0, 1] >= 0.8


def test_run_form_offers_saved_blocks(prefect_deployments, browser):
    """A block parameter is picked from the saved blocks of its type, by name, in the flat form."""
    from playwright.sync_api import expect
    from pydantic import SecretStr

    from detstream.blocks import EtcdCoordinator

    server, page = prefect_deployments, browser
    with server.settings():
        from prefect.client.orchestration import get_client

        EtcdCoordinator(endpoints=["http://etcd.example.org:2379"], username="alice",
                        password=SecretStr("not-shown")).save("site-etcd", overwrite=True, _sync=True)
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(STREAMING)
    page.goto(f"{server.url}/deployments/deployment/{dep.id}/run")
    etcd = _prop(page, "etcd")
    etcd.first.wait_for()
    etcd.get_by_role("button", name="EtcdCoordinator").click()
    etcd.locator("button.p-select-button__control").focus()
    page.keyboard.press(" ")  # opens the list of saved EtcdCoordinator blocks
    options = page.locator(".p-select-option[role=option]")
    options.filter(has_text="site-etcd").first.wait_for()
    _shot(page, "deployment-run-form-block-picker.png")
    text = _no_error_shown(page, "the run form's block picker")
    assert "not-shown" not in text
    options.filter(has_text="site-etcd").first.hover()
    page.mouse.down()  # a real press and release picks it (a synthetic click closes the list unpicked)
    page.mouse.up()
    expect(etcd.locator(".p-select-button__value")).to_have_text("site-etcd")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(rf".*/deployments/deployment/{dep.id}(\?.*)?$"))
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect_server import wait_for

    def submitted():
        with server.settings(), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        return [r for r in runs if r.parameters.get("etcd")]

    run = wait_for(submitted, 30, "the flow run submitted from the form")[0]
    with server.settings(), get_client(sync_client=True) as client:
        client.delete_flow_run(run.id)  # no worker runs it; it is not wanted after this test
    assert set(run.parameters["etcd"]) == {"$ref"}  # the block by reference: its password stays in the block
    with server.settings():
        from detstream.flows import streaming_session

        etcd_block = streaming_session.validate_parameters(run.parameters)["etcd"]
    assert etcd_block.password.get_secret_value() == "not-shown"
