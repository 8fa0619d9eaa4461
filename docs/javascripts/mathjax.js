// MathJax configuration for pymdownx.arithmatex (generic mode): TeX between \( \) and \[ \] in
// elements of class "arithmatex" only. MathJax itself (tex-chtml.js) is served from the site
// (javascripts/vendor/mathjax/, copied from the django-static-mathjax package by docs/_hooks.py)
// and typesets each page when it loads. (The theme's instant navigation, which would need a
// re-typeset on every page change, is not enabled; re-typesetting an already typeset page would
// clear the font styles and leave the formulas blank.)
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
