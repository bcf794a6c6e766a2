"""How docs/img/mlflow_view.png was taken: the link a search prints, opened in Chromium by
playwright (pip install playwright; Debian's chromium at /usr/bin/chromium), with MLflow's
assistant panel closed. Not a dependency of tunestab.

    mlflow ui --backend-store-uri sqlite:///RESULTS/mlflow.db --port 5057 &
    python docs/img/screenshot.py "http://127.0.0.1:5057/#/experiments/2/runs?workflowType=machine_learning&compareRunsMode=CHART&viewStateShareKey=tunestab-<parent run id>" docs/img/mlflow_view.png
"""

import sys

from playwright.sync_api import sync_playwright

url, out = sys.argv[1], sys.argv[2]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(url)
    page.wait_for_timeout(9000)  # the runs and their metric histories load after the page
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(1500)
    page.screenshot(path=out)
    browser.close()
