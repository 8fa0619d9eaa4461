// Formula check of the docs build (docs/_hooks.py): parse every formula with MathJax's TeX input.
// Usage: node _check_tex.js MATHJAX_ES5_DIR < formulas.json, where formulas.json is a list of
// {"tex": ..., "display": bool}. Prints a JSON list of {"index", "message"} for the formulas that
// do not render. The MathJax is the one the pages load (django-static-mathjax), with the same TeX
// packages, except that an undefined macro is an error here (on a page it would show in red).
"use strict";
const path = require("path");

const es5 = path.resolve(process.argv[2]);
let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const formulas = JSON.parse(input);
  require(path.join(es5, "node-main.js"))
    .init({
      loader: { load: ["input/tex"] },
      tex: {
        packages: { "[-]": ["noundefined"] },
        formatError: (jax, error) => {
          throw error;
        },
      },
    })
    .then((MathJax) => {
      const errors = [];
      formulas.forEach((formula, index) => {
        try {
          MathJax.tex2mml(formula.tex, { display: formula.display });
        } catch (error) {
          errors.push({ index, message: String(error.message || error) });
        }
      });
      process.stdout.write(JSON.stringify(errors));
    })
    .catch((error) => {
      console.error(error);
      process.exit(2);
    });
});
