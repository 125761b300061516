"""The memory as a model uses it: reading a user's documents (sources), ingesting them into a bank
(mbc.bank, below every model), the readers that turn a bank into each question's modulation, and
the service that holds one model and one bank for the commands and the server."""
