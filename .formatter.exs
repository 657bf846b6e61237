[
  inputs: [
    "{mix,.formatter}.exs",
    "{config,lib,test,integration,examples,bench}/**/*.{ex,exs}"
  ],
  locals_without_parens: []
]
