"""Language-model helpers for the stages: data, chat formatting, batching, loss, model folders, reports."""
