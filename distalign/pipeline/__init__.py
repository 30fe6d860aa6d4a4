"""The stage runner behind `distalign pipeline` (and `distalign synthetic`)."""
