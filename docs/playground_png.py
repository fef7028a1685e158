"""Make `docs/playground.png`: trained students solving one problem in the playground.

    python serve/app.py --decomposer outputs/bench/distill_quality/students/decomposer \
        --solver outputs/bench/distill_quality/students/solver --port 8011 &
    python docs/playground_png.py http://127.0.0.1:8011 docs/playground.png

The students are `benchmarks/distill_quality.py`'s (its default run writes them there). A real
headless Chromium types the problem, waits for the last step's answer, and saves the page.
"""

from __future__ import annotations

import shutil
import sys

PROBLEM = (
    "Sam has 19 stickers. Olga has 6 times as many stickers as Sam. Olga keeps 2/3 of the "
    "stickers and gives the rest away. Olga wins 12 more stickers. How many stickers does Olga "
    "have after winning more?"
)


def main(url: str, out: str) -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (browser and driver_path):
        sys.exit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "problem").send_keys(PROBLEM)
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1"
            or d.find_element(By.ID, "error").text
        )
        driver.save_screenshot(out)
        print(driver.find_element(By.ID, "answer").text)
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
