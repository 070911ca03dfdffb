"""The Beam job: manifests in, image shards out."""

import logging


class _BigQueryClientsNotice(logging.Filter):
    """Importing Beam with Google's client libraries installed but not apitools logs that
    BigQuery's clients are unavailable, once a process, on the root logger. jaxdiff uses
    no BigQuery: the line would only lead a user to a package the job does not need."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


logging.getLogger().addFilter(_BigQueryClientsNotice())
