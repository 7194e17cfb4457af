"""The patch: its folder format (format, checks, update), storing it (store), its card (card,
card_tables), applying it in memory (apply) or to model folders (merged, merged_card), and its
algebra (algebra). Import the module you need: this package face holds no names."""
