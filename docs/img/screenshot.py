"""How docs/img/mlflow_view.png, mlflow_table.png and mlflow_parent.png were taken: the links a
search prints, opened in Chromium by playwright (pip install playwright; Debian's chromium at /usr/bin/chromium),
with MLflow's assistant panel closed and a run's description shown whole. Not a dependency of
tunestab.

    mlflow ui --backend-store-uri sqlite:///RESULTS/mlflow.db --port 5057 &
    python docs/img/screenshot.py "http://127.0.0.1:5057/#/experiments/2/runs?workflowType=machine_learning&compareRunsMode=CHART&viewStateShareKey=tunestab-<parent run id>" docs/img/mlflow_view.png
    python docs/img/screenshot.py "http://127.0.0.1:5057/#/experiments/2/runs?workflowType=machine_learning&compareRunsMode=TABLE&viewStateShareKey=tunestab-<parent run id>" docs/img/mlflow_table.png
    python docs/img/screenshot.py "http://127.0.0.1:5057/#/experiments/1/runs/<parent run id>?workflowType=machine_learning" docs/img/mlflow_parent.png
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
    more = page.get_by_text("Show more", exact=True)
    if more.count():  # a run's description, folded after a few lines
        more.first.click()
        page.wait_for_timeout(1000)
    page.screenshot(path=out)
    browser.close()
