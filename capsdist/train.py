"""`python -m capsdist.train` (`capsdist-train`): the service's entry point; the CLI lives in capsdist.training.cli.

The job's signals are taken first, before the seconds of imports: a stop that lands before the fit begins (or
during validate/test/predict) ends the process at once, saying so, with the stop's exit code
(capsdist.cluster.signals, capsdist.cluster.requeue). The imports then run with the garbage collector paused
(capsdist.core.startup): about a fifth of a small run's CPU. Before Lightning's, while the process has one thread,
torch is imported and the loader workers' fork server is forked from the process
(capsdist.data.workers.fork_server), so that no second interpreter imports torch again.
"""

import sys

from capsdist.cluster import requeue, signals
from capsdist.core import startup
from capsdist.data import workers


def main(args: list[str] | None = None) -> None:
    """Run the training CLI (capsdist.training.cli.main); a stop during startup leaves at once, nothing saved."""
    try:
        signals.install(at_once=True)
        with startup.collector_paused():
            workers.fork_server()
            from capsdist.training.cli import main as cli_main  # the seconds of imports, after the handlers

        cli_main(args)
    except signals.StartupStop as stop:
        sys.exit(requeue.leave_at_startup(stop.request))


if __name__ == "__main__":
    main()
