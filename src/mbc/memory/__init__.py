"""The memory: bank entries (codecs, bit-packing), the durable SQLite bank, ingesting documents into it
and the readers that turn a bank into each question's modulation."""
