"""The training targets' one convention, shared by what writes labels (the chat template) and what reads them
(the loss), without torch: a stage that only encodes text does not load it."""

IGNORE_INDEX = -100  # target value that contributes nothing to the loss (masked prompt tokens, padding)
