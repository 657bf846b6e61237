defmodule Quichex.Connection.CID do
  @moduledoc false
  # Our connection IDs: random bytes of one fixed length, named here once.
  # A listener parses short-header packets by this length.

  @len 16

  @doc false
  def len, do: @len

  @doc false
  def generate, do: :crypto.strong_rand_bytes(@len)
end
