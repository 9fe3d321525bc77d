"""mpcli: the `mpstore` command line (click); rendering only, the logic lives in mpstore and mpexec."""
