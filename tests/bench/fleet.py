"""A fleet of FakeOpenAI servers in their own process, driven over stdin/stdout (JSON lines).

``python fleet.py ENDPOINTS MODELS_PER_ENDPOINT LATENCY [FLAVOR]`` prints ``{"urls": [...]}``
once every fake listens, then answers one JSON line per command: ``total`` (requests so far),
``counts`` (requests per endpoint), ``reset``, ``mode I MODE``, ``quit``. The fakes are the
project's own (daemon.testing.fakes); this file only hosts them out of the measured process.
"""

from __future__ import annotations

import json
import sys

from daemon.testing.fakes import FakeOpenAI, FakeServers


def main(argv: list[str]) -> int:
    endpoints, per_endpoint, latency = int(argv[1]), int(argv[2]), float(argv[3])
    flavor = argv[4] if len(argv) > 4 else "openai"
    with FakeServers() as servers:
        fakes = [
            servers.start(FakeOpenAI([f"m{e}-{n}" for n in range(per_endpoint)],
                                     flavor=flavor, latency=latency))
            for e in range(endpoints)
        ]

        def reply(value: object) -> None:
            sys.stdout.write(json.dumps(value) + "\n")
            sys.stdout.flush()

        reply({"urls": [fake.url for fake in fakes]})
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "total":
                reply(sum(fake.total_requests for fake in fakes))
            elif words[0] == "counts":
                reply([fake.total_requests for fake in fakes])
            elif words[0] == "reset":
                for fake in fakes:
                    fake.reset_counts()
                reply("ok")
            elif words[0] == "mode":
                fakes[int(words[1])].set_mode(words[2])
                reply("ok")
            elif words[0] == "quit":
                reply("bye")
                break
            else:
                reply({"error": f"unknown command {words[0]}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
