"""The Prefect UI in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright)
opens the UI of the test's ``prefect server start`` (the ``live_prefect`` fixture), finds the
pipeline deployment, starts a custom run with one parameter changed in the form, and sees the run
complete.  Screenshots are kept under ``test-artifacts/browser/`` (git-ignored) and their paths printed."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import TINY

from imagegen import serve as S

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"
# the one field changed in the form: the deployment's defaults are the tiny pipeline with 5 steps, the
# form sets TINY's 6, so the run is test_orchestration.py's first request on the same (shared) data root
BEFORE, AFTER = "train.steps=5", "train.steps=6"


@pytest.fixture
def tiny_pipeline_defaults(live_prefect):
    """The pipeline deployment's default parameters set to the tiny pipeline (what a user does on the
    deployment's Edit page), so that the form opens with them; restored afterwards."""
    from prefect.client.schemas.actions import DeploymentUpdate

    assert AFTER in TINY
    defaults = [BEFORE if o == AFTER else o for o in TINY]
    with S.client(live_prefect.api_url) as c:
        dep = c.read_deployment_by_name("pipeline/pipeline")
        c.update_deployment(dep.id, DeploymentUpdate(parameters={"preset": "smoke", "overrides": defaults}))
    yield dep
    with S.client(live_prefect.api_url) as c:
        c.update_deployment(dep.id, DeploymentUpdate(parameters=dep.parameters))


def _shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}", file=sys.stderr)
    return path


def _field_with_value(page, value: str):
    """The text field (input or textarea) of the form whose current value is ``value``."""
    fields = page.locator("textarea, input[type=text], input:not([type])")
    page.wait_for_function("v => [...document.querySelectorAll('textarea, input')].some(e => e.value === v)", arg=value)
    for i in range(fields.count()):
        if fields.nth(i).input_value() == value:
            return fields.nth(i)
    raise AssertionError(f"no form field holds {value!r}")


def test_custom_pipeline_run_from_the_ui(live_prefect, tiny_pipeline_defaults):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (.ci/run installs it: apt-get install -y "
                    "chromium); Playwright's own browser download is not used")
    from playwright.sync_api import expect, sync_playwright

    from imagegen.train.runs import list_runs

    live = live_prefect
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{live.ui_url}/deployments", wait_until="networkidle")
            page.get_by_role("link", name="pipeline", exact=True).first.click()
            expect(page.get_by_text("flows/pipeline.py:pipeline_flow")).to_be_visible()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("link", name="Custom run").click()
            field = _field_with_value(page, BEFORE)
            field.fill(AFTER)
            run_name = f"from-the-browser-{int(time.time())}"
            page.locator(".flow-run-name-input input").fill(run_name)  # to find the run in the list below
            _shot(page, "1-custom-run-form")
            # the UI goes back to the deployment's runs; open the new one.  Once (CI, two xdist workers on
            # 2 cores) it showed "Oops. Something went wrong." after Submit instead, the form still filled in:
            # then, as a user would, submit again (once), and print the requests that failed
            failed: list[str] = []
            page.on("response", lambda r: failed.append(f"{r.status} {r.request.method} {r.url}")
                    if r.status >= 400 else None)
            link = page.get_by_role("link", name=run_name, exact=True).first
            oops = page.get_by_text("Something went wrong").first
            for attempt in (1, 2):
                page.get_by_role("button", name="Submit", exact=True).click()
                expect(link.or_(oops)).to_be_visible()
                if link.is_visible():
                    break
                _shot(page, f"submit-error-{attempt}")
                print(f"submit {attempt}: the UI said 'Something went wrong'; failed requests: {failed}",
                      file=sys.stderr)
                try:  # the toast goes by itself; wait for it, so the next try is not read by the old one
                    expect(oops).to_be_hidden(timeout=30_000)
                except AssertionError:
                    pass
            else:
                raise AssertionError(f"the UI refused the custom run twice; failed requests: {failed}")
            link.click()
            page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
            flow_run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)
            t0 = time.monotonic()
            run = S.wait_for_flow_run(live.api_url, flow_run_id, timeout=900)
            # the run page shows the final state (it polls; a reload makes sure)
            badge = page.get_by_text(run.state.name, exact=True).first
            try:
                expect(badge).to_be_visible(timeout=15_000)
            except AssertionError:
                page.reload(wait_until="networkidle")
                expect(badge).to_be_visible()
            _shot(page, "2-flow-run")
            print(f"pipeline run from the UI: {run.state.name} after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        except BaseException:
            _shot(page, "failure")
            raise
        finally:
            browser.close()
    assert run.state.is_completed(), (f"{run.name}: {run.state.name}: {run.state.message}\n"
                                      f"worker log ({live.worker.log}):\n{live.worker.tail(80)}")
    # the form's change reached the flow run, and the pipeline trained 6 steps
    assert AFTER in run.parameters["overrides"] and BEFORE not in run.parameters["overrides"]
    assert run.deployment_id == tiny_pipeline_defaults.id and run.name == run_name
    assert run.parameters.get("data_root") is None  # so the run used the worker's IMAGEGEN_DATA_ROOT
    trained = [r for r in list_runs(live.data_root) if r.card.get("family") == "flow"
               and r.card["config"].get("steps") == 6]
    assert len(trained) == 1 and trained[0].card["status"] == "finished"
