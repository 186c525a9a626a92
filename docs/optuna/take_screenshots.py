"""Screenshots of optuna-dashboard 0.21 (headless Chromium through Playwright) over a small searched sweep.

Run (a Playwright install with a system Chromium; the sweep and the dashboard first):
    python -m sweeper run search_spaces/svsl_search.yaml --smoke --set 'grid.etf=[{depth: 0}, {depth: 1}]' \\
        --storage /tmp/oshots/sweeps
    optuna-dashboard sqlite:////tmp/oshots/sweeps/svsl-search-smoke/optuna.db --port 8088 &
    python docs/optuna/take_screenshots.py
(`sweeper status NAME` prints the dashboard command of a searched sweep.)
"""

from playwright.sync_api import sync_playwright

base = "http://127.0.0.1:8088/dashboard"
out = "/work/main/docs/optuna"
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1400, "height": 800})
    page.goto(base)
    page.wait_for_timeout(4000)
    page.screenshot(path=f"{out}/study_list.png")
    page.goto(f"{base}/studies/1")
    page.wait_for_timeout(5000)
    page.screenshot(path=f"{out}/study_page.png", full_page=True)
    browser.close()
