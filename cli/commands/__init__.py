"""One module per `stallscope` subcommand."""
