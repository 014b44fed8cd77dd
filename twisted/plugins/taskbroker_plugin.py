# This module is imported by twistd to list its subcommands, before the
# reactor is chosen: it must import nothing but ServiceMaker.  The tap
# modules are named by string and loaded only when a daemon starts.
from twisted.application.service import ServiceMaker

taskbroker = ServiceMaker(
    "taskbroker broker",
    "taskbroker.broker.tap",
    "Keep tasks in a database and hand each to a ready worker.",
    "taskbroker",
)

taskworker = ServiceMaker(
    "taskbroker worker",
    "taskbroker.worker.tap",
    "Run tasks handed out by a taskbroker, one per free slot.",
    "taskworker",
)
