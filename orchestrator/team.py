"""A team's MLflow server (``mlflow server --app-name basic-auth``): add a user, grant a sweep.

    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=...   # the admin's
    python -m orchestrator.team --mlflow-uri https://mlflow.example.org add-user alice
    python -m orchestrator.team --mlflow-uri https://mlflow.example.org grant alice my-sweep READ

``add-user`` asks for the new user's password twice (``--password-stdin`` reads one line from
standard input instead, for scripts). ``grant`` gives a user READ, EDIT, MANAGE or
NO_PERMISSIONS on the experiment of a sweep (its ``--name``); a sweep's own user has MANAGE on
the experiment it created already. The admin's credentials are read from MLflow's own
variables (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``); a certificate of a
private CA from ``MLFLOW_TRACKING_SERVER_CERT_PATH``. No password is printed or stored here.
Bad input or a refusal by the server is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from orchestrator.mlflow_client import TrackingError, check_tracking_uri, redact

__all__ = ["main"]

PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


class TeamError(Exception):
    """One line for the user: what failed and where, never a password."""


def _refused(uri: str, what: str, exc: Exception) -> TeamError:
    """The server's own reason (MLflow's error code and message: they never hold the
    password), on one line."""
    code = getattr(exc, "error_code", "") or type(exc).__name__
    message = str(getattr(exc, "message", "") or exc).removeprefix(f"{code}: ")
    message = redact(" ".join(message.split()))[:200]  # it may repeat the URI
    hint = ("; the admin's MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD must be set"
            if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") else "")
    return TeamError(f"--mlflow-uri {redact(uri)}: {what} refused ({code}: {message}){hint}")


def _password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("new user's password: ")
        if getpass.getpass("again: ") != password:
            raise TeamError("the two passwords differ")
    if not password:
        raise TeamError("the password is empty")
    return password


def _auth_client(uri: str):
    import warnings

    with warnings.catch_warnings():  # its server-side imports warn about Starlette
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient
    return AuthServiceClient(uri)


def add_user(uri: str, username: str, password: str) -> None:
    try:
        _auth_client(uri).create_user(username, password)
    except Exception as exc:  # noqa: BLE001 - MLflow's REST errors and connection errors alike
        raise _refused(uri, f"adding user {username!r}", exc) from None


def grant(uri: str, username: str, sweep: str, permission: str) -> str:
    """Grant ``permission`` on sweep ``sweep``'s experiment; its id."""
    from mlflow import MlflowClient

    try:
        experiment = MlflowClient(uri).get_experiment_by_name(sweep)
    except Exception as exc:  # noqa: BLE001
        raise _refused(uri, f"looking up sweep {sweep!r}", exc) from None
    if experiment is None:
        raise TeamError(f"--mlflow-uri {redact(uri)}: no experiment named {sweep!r} (a sweep's "
                        "experiment is its --name)")
    client = _auth_client(uri)
    try:
        client.grant_user_permission(username, "experiment", experiment.experiment_id,
                                     permission)
    except Exception as exc:  # noqa: BLE001
        raise _refused(uri, f"granting {permission} on {sweep!r} to {username!r}", exc) from None
    return experiment.experiment_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.team",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--mlflow-uri", required=True, help="the team's tracking server")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add-user", help="create a user (asks for the password)")
    add.add_argument("username")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from one line of standard input")
    give = commands.add_parser("grant", help="a user's permission on a sweep's experiment")
    give.add_argument("username")
    give.add_argument("sweep", help="the sweep's name (its MLflow experiment)")
    give.add_argument("permission", choices=PERMISSIONS)
    args = parser.parse_args(argv)
    if not args.mlflow_uri.startswith(("http://", "https://")):
        print(f"error: --mlflow-uri {redact(args.mlflow_uri)}: users live on a tracking "
              "server (http:// or https://)", file=sys.stderr)
        return 2
    try:
        # one quick request first: an unreachable server or refused credentials are one line
        # at once, without MLflow's retries
        check_tracking_uri(args.mlflow_uri)
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "add-user":
            add_user(args.mlflow_uri, args.username, _password(args.password_stdin))
            print(f"user {args.username!r} added at {redact(args.mlflow_uri)}")
        else:
            experiment = grant(args.mlflow_uri, args.username, args.sweep, args.permission)
            print(f"{args.username!r} has {args.permission} on sweep {args.sweep!r} "
                  f"(experiment {experiment})")
    except TeamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
