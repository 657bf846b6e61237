defmodule Quichex.CIDGenerator do
  @moduledoc """
  A behaviour that makes connection IDs, for deployments that encode routing
  information in them (a load balancer can then route every packet of a
  connection, after a migration too, to the node that owns it).

  Pass a module, or `{module, options}`, as the `:connection_id_generator`
  option of `Quichex.Listener.start_link/1` or
  `Quichex.Connection.connect/1`. It makes every connection ID of the
  connections there: the first one, those offered to the peer later, and the
  one in a Retry. Each must be `length` bytes (Quichex's connection IDs are
  #{Quichex.Connection.CID.len()} bytes; a listener parses short-header
  packets by that length) and unique among the connections it routes: put
  enough unpredictable bytes in.

      defmodule MyApp.NodeCIDs do
        @behaviour Quichex.CIDGenerator

        # The first byte names the node; the rest is random.
        @impl true
        def generate_cid(length, node_byte),
          do: <<node_byte>> <> :crypto.strong_rand_bytes(length - 1)
      end

      Quichex.Listener.start_link(
        port: 4433,
        config: config,
        handler: MyHandler,
        connection_id_generator: {MyApp.NodeCIDs, 7}
      )

  The default makes random IDs (`Quichex.CIDGenerator.Random`);
  `Quichex.CIDGenerator.QuicLB` makes the routable IDs of QUIC-LB
  (draft-ietf-quic-load-balancers) for load balancers that decode them.

  ## Preparing options once

  `generate_cid/2` is called for every connection ID. A generator with
  costly setup (validating options, preparing keys, a counter shared by all
  the connections) defines the optional `prepare/1`: it is called once, where
  the option is given (`Quichex.Listener.start_link/1`,
  `Quichex.Connection.connect/1`), and what it returns is passed to every
  `generate_cid/2` instead of the options. (It is not called `init/1` so
  that a module that is also, say, a `GenServer` can be a generator.) It may raise `ArgumentError` for
  bad options, which then fails the call that was given them. A generator
  without `prepare/1` gets its options as given.
  """

  @doc "Returns a new connection ID of exactly `length` bytes."
  @callback generate_cid(length :: pos_integer(), options_or_state :: term()) :: binary()

  @doc "Prepares `options` once; the result is passed to every `generate_cid/2`."
  @callback prepare(options :: term()) :: state :: term()

  @optional_callbacks prepare: 1
end

defmodule Quichex.CIDGenerator.Random do
  @moduledoc """
  The default `Quichex.CIDGenerator`: strong random bytes.

      iex> byte_size(Quichex.CIDGenerator.Random.generate_cid(16, []))
      16
  """
  @behaviour Quichex.CIDGenerator

  @impl true
  def generate_cid(length, _options), do: :crypto.strong_rand_bytes(length)
end
