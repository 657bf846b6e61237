defmodule Quichex.Connection.State do
  @moduledoc false
  # The connection process's state (the gen_statem data; the state name is
  # separate: :handshaking, :established, :draining, :closed).

  alias Quichex.Connection.{Streams, WriteQueue}

  @enforce_keys [:role, :native, :socket, :local, :peer]
  defstruct [
    :role,
    :native,
    :socket,
    :local,
    :peer,
    # Client connections own their socket; server ones send on the listener's.
    owns_socket: false,
    gso: false,
    # The controlling process (nil for a handler connection until its
    # handler process starts) and its monitor.
    owner: nil,
    owner_ref: nil,
    # Send connection messages to the owner; the default :active of the
    # streams we open.
    active: true,
    # The default :active of streams the peer opens.
    stream_active: true,
    # A listener's server code: {:handler, module, options} for a
    # Quichex.Handler, {:connection_handler, module} for a
    # Quichex.ConnectionHandler.
    handler: nil,
    # The process running a Quichex.ConnectionHandler's callback.
    runner: nil,
    # %{pid, mode, table} for a connection a listener accepted.
    listener: nil,
    # Our connection IDs (routed to us by the listener, for a server
    # connection), how new ones are made, and the key of their stateless
    # reset tokens.
    cids: [],
    cid_generator: nil,
    reset_key: nil,
    # Network paths and a client's extra sockets (Quichex.Connection.Paths).
    paths: nil,
    # The latest session ticket (clients).
    session: nil,
    # A client that sent 0-RTT data (a session and early_data: true); 0-RTT
    # keys are in use; the outcome once known (:accepted | :rejected | :none).
    early_data: false,
    in_early_data: false,
    early_data_outcome: :none,
    retry: false,
    started_at: nil,
    # wait_connected/2 callers.
    waiters: [],
    # Why we are closing, set when the close starts: :local, :owner_down or
    # :refused (a server refusing a client at the end of the handshake),
    # and the code we sent; the full reason is read from quiche on draining.
    closing: nil,
    close_code: 0,
    close_reason: nil,
    streams: nil,
    writes: nil,
    # Input for the next poll, gathered from stream processes.
    credits: %{},
    commands: [],
    # The last poll ran out of read budget: poll again.
    repoll: false,
    # DATAGRAMs (RFC 9221): see Quichex.Connection.Datagrams.
    dgrams: nil,
    # Packets lost so far, as last reported (for the packets_lost event).
    packets_lost: 0,
    # A :quichex_pass message is on its way to us.
    pass_pending: false,
    # Batches quiche's pacer wants sent later: {due_us, batch}, in order;
    # how many were held so far.
    paced: {[], []},
    paced_count: 0
  ]

  @type t :: %__MODULE__{
          role: :client | :server,
          native: reference(),
          socket: :socket.socket(),
          local: {:inet.ip_address(), :inet.port_number()},
          peer: {:inet.ip_address(), :inet.port_number()},
          owns_socket: boolean(),
          gso: boolean(),
          owner: pid() | nil,
          owner_ref: reference() | nil,
          active: boolean(),
          stream_active: Quichex.Stream.active(),
          handler: {:handler, module(), term()} | {:connection_handler, module()} | nil,
          runner: pid() | nil,
          listener:
            %{
              pid: pid(),
              mode: :active | :handler,
              shared: map(),
              client_cert: :none | :optional | :require
            }
            | nil,
          cids: [binary()],
          cid_generator: {module(), term()},
          reset_key: binary(),
          paths: Quichex.Connection.Paths.t(),
          session: binary() | nil,
          early_data: boolean(),
          in_early_data: boolean(),
          early_data_outcome: :accepted | :rejected | :none,
          retry: boolean(),
          started_at: integer() | nil,
          waiters: [:gen_statem.from()],
          closing: nil | :local | :owner_down | :refused,
          close_code: non_neg_integer(),
          close_reason: term(),
          streams: Streams.t(),
          writes: WriteQueue.t(),
          credits: %{non_neg_integer() => pos_integer()},
          commands: [{non_neg_integer(), :read | :write | :detach, non_neg_integer()}],
          repoll: boolean(),
          dgrams: Quichex.Connection.Datagrams.t(),
          packets_lost: non_neg_integer(),
          pass_pending: boolean(),
          paced: :queue.queue(),
          paced_count: non_neg_integer()
        }

  @doc false
  def new(fields) do
    {dgram_opts, fields} = Keyword.pop(fields, :dgrams, [])
    state = struct!(__MODULE__, fields)

    %{
      state
      | streams: Streams.new(state.role),
        writes: WriteQueue.new(),
        dgrams: Quichex.Connection.Datagrams.new(dgram_opts),
        paths: Quichex.Connection.Paths.new(state.local, state.peer)
    }
  end
end
