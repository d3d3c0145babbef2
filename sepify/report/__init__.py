"""Reports as data (conversion, audit) and their renderings (text, Markdown, CSV; the audit chart)."""
