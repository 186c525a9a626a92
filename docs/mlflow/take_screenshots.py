"""Screenshots of the real MLflow UI (headless Chromium through Playwright) over a quickstart sweep.

Run (a Playwright install with a system Chromium; the sweep and the UI first):
    MLFLOW_TRACKING_URI=sqlite:////tmp/shots/mlflow.db python -m sweeper run search_spaces/quickstart.yaml \\
        --storage /tmp/shots/sweeps
    mlflow ui --backend-store-uri sqlite:////tmp/shots/mlflow.db --host 127.0.0.1 --port 5077 &
    echo "<experiment id> <a trial run id>" > /tmp/shots/ids
    echo "<the charts: link run printed>" > /tmp/shots/charts
    python docs/mlflow/take_screenshots.py
"""

import sys

from playwright.sync_api import sync_playwright

exp, run = open("/tmp/shots/ids").read().split()
base = "http://127.0.0.1:5077"
# `run` prints the link for `mlflow ui`'s default port; these screenshots use another.
charts = open("/tmp/shots/charts").read().strip().replace("http://127.0.0.1:5000", base)
out = "/work/main/docs/mlflow"
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.goto(f"{base}/#/experiments/{exp}/runs")
    page.wait_for_timeout(4000)
    for label in ("Model training",):
        try:
            page.get_by_text(label, exact=True).first.click(timeout=3000)
            page.wait_for_timeout(1500)
        except Exception as e:
            print("no toggle", e, file=sys.stderr)
    try:  # the assistant side panel takes a third of the width
        page.locator("button[aria-label*='lose']").last.click(timeout=2000)
    except Exception as e:
        print("no close", e, file=sys.stderr)
    page.goto(f"{base}/#/experiments/{exp}/runs")
    page.wait_for_timeout(3000)
    # expand the sweep's parent run to show its trials (the small box left of its name)
    box = page.get_by_text("quickstart", exact=True).last.bounding_box()
    page.mouse.click(box["x"] - 28, box["y"] + box["height"] / 2)
    page.wait_for_timeout(2000)
    page.screenshot(path=f"{out}/runs_table.png")
    page.goto(f"{base}/#/experiments/{exp}/runs/{run}/model-metrics")
    page.wait_for_timeout(6000)
    page.screenshot(path=f"{out}/trial_metrics.png")
    page.goto(f"{base}/#/experiments/{exp}/runs/{run}")
    page.wait_for_timeout(4000)
    page.screenshot(path=f"{out}/trial_overview.png", full_page=True)
    # The sweep's saved view as its printed link opens it in a new browser: one line per variant, no
    # empty legend entry for the parent.
    page = browser.new_context(viewport={"width": 1600, "height": 1100}).new_page()
    page.goto(charts)
    page.wait_for_timeout(4000)
    try:
        page.locator("button[aria-label*='lose']").last.click(timeout=2000)
    except Exception as e:
        print("no close", e, file=sys.stderr)
    page.wait_for_timeout(6000)
    page.screenshot(path=f"{out}/sweep_charts.png")
    browser.close()
