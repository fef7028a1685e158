"""Ask the served students a problem and print the Socratic trace.

python serve/client.py "Ann has 3 bags of 4 apples. How many apples?" [--stream]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("problem")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the Serve endpoint")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print each step as it is solved")
    a = p.parse_args(argv)
    body = {"problem": a.problem, "stream": a.stream}
    if a.max_steps is not None:
        body["max_steps"] = a.max_steps
    req = urllib.request.Request(
        f"{a.url}/solve",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            if not a.stream:
                out = json.load(resp)
                for k, s in enumerate(out["steps"], 1):
                    print(f"Q{k}: {s['question']}\nA{k}: {s['answer']}")
                print(f"answer: {out['answer']}  ({out['timings'].get('request_s', '?')} s)")
                return 0
            event = None
            for line in resp:
                text = line.decode().rstrip("\n")
                if text.startswith("event: "):
                    event = text[7:]
                elif text.startswith("data: "):
                    data = json.loads(text[6:])
                    if event == "step":
                        print(
                            f"Q{data['k']}: {data['question']}\nA{data['k']}: {data['answer']}",
                            flush=True,
                        )
                    elif event == "done":
                        print(f"answer: {data['answer']}")
                    elif event == "error":
                        print(f"error: {data['error']}", file=sys.stderr)
                        return 1
            return 0
    except urllib.error.HTTPError as e:
        print(f"error {e.code}: {e.read().decode()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
