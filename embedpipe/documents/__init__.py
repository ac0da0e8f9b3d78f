"""Step 1, chunk: documents (md, rst, html, txt, pdf) -> sections -> passages."""
