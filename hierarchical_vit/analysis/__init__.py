"""Analysis of sweep results: small-sample statistics, tables and plots."""
